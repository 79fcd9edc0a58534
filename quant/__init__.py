"""quant: localglm's 2/4/8-bit weight formats, packing, mixed-precision recipes, expert blobs and the CPU/CUDA
kernels that multiply with them. It knows no model (it never imports localglm or offload); quant/README.md
describes the modules and the byte layouts."""
