"""The science, torch and transformers only: crosscoders (standard, DSF, DFC), their sparse kernels and trainer,
metrics and the toy benchmark here; `lm` reads language models, `analysis` and `behaviour` interpret features."""
