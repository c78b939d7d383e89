"""C++ (OpenMP) CPU kernels of the fused SpeeD step; the sources ship with the package and are built on first use."""
