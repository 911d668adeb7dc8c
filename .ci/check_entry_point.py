"""Check that an engine's plugin entry point of eplb-plugin is installed in this environment.

    python .ci/check_entry_point.py GROUP VALUE STAND_IN

setup.py declares the entry points; earlier versions of the CI scripts registered them with a
metadata-only distribution named STAND_IN, which is removed here where a machine still has it.
"""

import glob
import importlib.metadata as md
import shutil
import sys
import sysconfig

group, value, stand_in = sys.argv[1:]
for old in glob.glob(f"{sysconfig.get_paths()['purelib']}/{stand_in}-0.0.0.dist-info"):
    shutil.rmtree(old)
if not any(ep.value == value for ep in md.entry_points(group=group)):
    sys.exit(f"the {group} entry point {value} of eplb-plugin is not installed")
