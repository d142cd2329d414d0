"""Pure array operations used inside the jit boundary."""
