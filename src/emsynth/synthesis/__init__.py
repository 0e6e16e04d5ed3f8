"""Stage: mask layouts for synthetic image/mask pairs (real, deformed, procedural), which a
trained generator (`emsynth.gan.inference`) turns into EM images."""
