"""Knowledge distillation of quantized weights (torch): fake-quant linears with trainable clipping, trained decoder
layer by decoder layer against the float model's layer outputs."""
