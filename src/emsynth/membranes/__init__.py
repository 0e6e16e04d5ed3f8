"""Stage 2, membrane transfer: a U-Net that predicts cell membranes from (EM image,
mitochondria mask), trained on Drosophila VNC with domain-robustness augmentation and applied
to CA1 hippocampus, which has no membrane labels (the GAN needs both masks)."""
