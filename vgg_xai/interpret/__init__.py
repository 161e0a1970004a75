"""Interpretation of trained models: computation only (arrays in, arrays and plain dicts out).

Drawing and file formats live elsewhere. One module per question:
    probes        which test images to look at
    hooks         the one owner of forward hooks and of the temporary eval / no-inplace state
    filters       conv weights and feature maps
    activations   BatchNorm input/output histograms
    cam           class activation maps (Grad-CAM, HiResCAM, Grad-CAM++, CAM)
    faithfulness  deletion / insertion AUC of a map
    sanity        cascading model-randomization check of a map method
    embedding     PCA and t-SNE of feature vectors
    clusters      Gaussian mixtures, BIC scans, cluster-vs-label scores
    metrics       confusion, per-class accuracy, calibration error
    degenerate    is a result degenerate (collapsed features, one class, flat maps)?
"""
