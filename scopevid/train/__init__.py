"""Training the bundled tiny model: synthetic world, diffusion-forcing loop, detector, evaluation."""
