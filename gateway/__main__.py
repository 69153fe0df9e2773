import sys

from llorch.gateway.cli import main

sys.exit(main())
