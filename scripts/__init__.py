"""Helpers for the latent-diffusion enhancement bundle: what MONAI itself does not provide."""

from scripts import errors

errors.install()
