"""The projector's optional output RMS norm: image tokens on the scale of the LM's text embeddings."""

import torch

from edgeqa.vlm.model import Projector, ProjectorConfig


def test_out_rms_puts_every_image_token_on_the_text_embeddings_scale(tmp_path):
    torch.manual_seed(0)
    p = Projector(ProjectorConfig(in_dim=12, n_tokens=4, lm_hidden=16, hidden=8, out_rms=0.05))
    with torch.no_grad():
        p.mlp[2].bias.fill_(100.0)  # a huge shared component, as training grew without the norm
    x = torch.randn(3, 4, 12)
    out = p(x) - p.pos
    assert torch.allclose(out.pow(2).mean(-1).sqrt(), torch.full((3, 4), 0.05), rtol=1e-4)
    p.save_pretrained(tmp_path)
    q = Projector.from_pretrained(tmp_path)
    assert q.config.out_rms == 0.05 and torch.allclose(q(x), p(x))
    off = Projector(ProjectorConfig(in_dim=12, n_tokens=4, lm_hidden=16, hidden=8))
    assert off.config.out_rms == 0.0, "students and earlier teachers keep the plain projector"
