"""Measuring: how a backend is timed (clock), the floor MLP and the roofline it is held to, how its
answers are compared, the printed block, the machine it ran on, and LoadGen's systems under test."""
