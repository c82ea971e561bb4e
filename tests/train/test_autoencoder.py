"""First-stage autoencoder training: reconstruction improves and the latent scaling is fitted."""

import torch

from bagel.config import BagelConfig
from bagel.train.autoencoder import AutoencoderTrainConfig, reconstruction_error, train_autoencoder


def test_autoencoder_learns_and_fits_its_latent_scaling():
    g = torch.Generator().manual_seed(0)
    images = torch.full((32, 3, 32, 32), -1.0)
    for i, o in enumerate(torch.randint(4, 24, (32,), generator=g).tolist()):
        images[i, :, o:o + 4, 6:26] = 1.0  # a bar at a random height
    vae, losses = train_autoencoder(images, BagelConfig.digits().vae,
                                    AutoencoderTrainConfig(steps=40, batch_size=16), progress=False)
    assert len(losses) == 40 and sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert not vae.training
    assert reconstruction_error(vae, images) < losses[0]
    with torch.no_grad():
        z = vae.encode(images, sample=False)  # scaled latents: (mean - shift) * scale
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1.0) < 1e-2
