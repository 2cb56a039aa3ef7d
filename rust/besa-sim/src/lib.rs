//! besa-sim: the ViTCoD sparse-accelerator cycle model (reference and full modes).
