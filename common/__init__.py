"""What the entry scripts share: command-line edges, checkpoints, measuring, sessions, viewers."""
