#!/bin/sh
# Optional fixed identity (the testnet's bootstrap node): its peer id must be known to the others in advance.
set -e
if [ -n "${KVSWAP_IDENTITY_SEED_HEX:-}" ] && [ ! -f /data/identity.key ]; then
  mkdir -p /data
  python -c "import os; fd = os.open('/data/identity.key', os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600); os.write(fd, bytes.fromhex(os.environ['KVSWAP_IDENTITY_SEED_HEX']))"
fi
exec kvswap "$@"
