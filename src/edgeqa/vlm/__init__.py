"""The vision-language machinery the teacher and the student share: the pretrained Lite0 backbone (`vision`),
constrained option scoring (`scoring`), the projector + LM model and its answer layout (`model`), and the
teacher LM's GGUF-to-safetensors conversion (`convert`)."""
