"""The edge student: the model (`model`), its pruned vocabulary (`vocab`), frozen-trunk features (`features`),
the shared training loop and tail (`train`), the distillation loss (`kd.DistillLoss`), the `sft`/`baseline` and
`distill` stages, and the ONNX export for the runtime (`export`)."""
