"""Facts both halves must agree on, defined once (no torch, no jax)."""

# Default models of the data stage, which generation falls back to for data sets without them.
DEFAULT_VAE = "madebyollin/sdxl-vae-fp16-fix"
DEFAULT_TEXT_ENCODER = "clip=openai/clip-vit-large-patch14"
# The pass-through autoencoder: images are stored as pixels in [-1, 1] instead of latents.
PIXEL = "pixel"
# The references feed the raw VAE latent divided by 8 (spec section 1); decoding multiplies
# by 8 again.
REFERENCE_LATENT_SCALE = 8.0
# Licences the data stage keeps by default (`data_prep.encode --licenses`) and the trainer
# accepts by default (`data.licenses`): public domain and attribution(-share-alike) only.
DEFAULT_ALLOWED_LICENSES = ("cc0", "pdm", "cc-by", "cc-by-sa")
# What a sample without (recognised) licence data counts as.
UNKNOWN_LICENSE = "unknown"
