import sys

from llorch.node.cli import main

sys.exit(main())
