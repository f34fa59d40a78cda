"""python -m mesh.plan: plan table sharding from a tables file and a topology, without devices."""

import sys

from mesh.planner_cli import main

sys.exit(main())
