"""Exports of trained models for other tools (`emsynth export ...`): bioimage.io packages.

A top layer: it may import segment, membranes and gan; nothing imports it.
"""
