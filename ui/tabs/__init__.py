"""One module per studio tab: each builds its components and wires its events."""
