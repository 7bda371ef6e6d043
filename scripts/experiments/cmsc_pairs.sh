#!/usr/bin/env bash
# CMSC pair validity on CPSC 2021 (beat-annotated paroxysmal AF): how often the two adjacent 5 s segments of a
# CMSC pair share their rhythm label. No model involved. Usage: scripts/experiments/cmsc_pairs.sh
source "$(dirname "$0")/common.sh"
"$PY" "$ROOT/scripts/experiments/cmsc_pairs.py" "$DATA/cpsc2021"
