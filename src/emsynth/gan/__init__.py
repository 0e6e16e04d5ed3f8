"""Stage: the pix2pix conditional GAN that turns masks (mitochondria, membranes) into EM images.

networks.py (U-Net generator, three-scale PatchGAN), losses.py, data.py (input encoding,
paired crops), task.py (`GanTask` for the shared engine), train.py, export.py (the generator
file: `export_generator`, `load_generator`), cli.py (`emsynth gan`).
"""
