"""Grad-CAM heatmaps of SSD300 detections (cam.py) and pictures of detections (draw.py)."""
