"""C++ kernels for XLA:CPU, built on first use or by `make setup`, called through XLA's FFI."""
