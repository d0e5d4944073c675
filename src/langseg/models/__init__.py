"""Networks: plain ``nn.Module``s that take and return tensors.

Nothing here touches files, images, tokenisers or the registry, and nothing here imports any other part
of langseg than :mod:`langseg.errors` (``tests/test_architecture.py`` checks it). Modules:

- ``lseg`` (LSegNet, LSeg), ``lseg_zeroshot`` (the zero-shot variants and their others-vs-class
  scoring), ``dpt``, ``backbones`` (timm ViT and ResNet towers), ``text`` (open_clip text tower);
- ``dense_clip`` (training-free dense CLIP, DenseCLIPModel), ``pamr`` (PAMR refinement);
- ``vlt``, ``vlt_modules``, ``text_gru`` (VLT and its word encoders).

The registry entries that name these networks, their weights and their predictors live in
:mod:`langseg.zoo`.
"""
