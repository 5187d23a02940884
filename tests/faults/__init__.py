"""The fault corpus: bad inputs and faults, each run through the real CLI (see ``harness``)."""
