import sys

from sae_discover.cli import main

sys.exit(main())
