"""What every part of ckl needs from the process it runs in: where local state lives (`paths`) and the
crash points of the exactly-once tests (`faults`). Imports nothing else of ckl, so any package may use it."""
