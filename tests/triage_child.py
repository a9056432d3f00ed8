"""A Python program for `python -c` that triages a loop config in a process of its own (to kill or race it):
`argv[1]` is the config's JSON file, `argv[2]` the output directory."""

CHILD = """
import sys
from flows.triage import triage
from tasks.config import LoopConfig
triage(config=LoopConfig.model_validate_json(open(sys.argv[1]).read()), out=sys.argv[2])
"""
