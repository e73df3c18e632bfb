"""Evaluation metrics for image generation: FID and Inception features, CLIP score.

Modules (imported on demand, none eagerly): inception (the FID InceptionV3 and its weights), torch_pickle (a
restricted .pth reader), fid (streaming statistics, Fréchet distance, KID), precision_recall (k-NN precision and
recall), clip_score, run (the eval CLI's library side), evaluator (config.eval: evaluation inside training runs),
digits (the shipped MNIST classifier: digit FID, accuracy, `train_classifier`), colored_digits (the judge of the
coloured-digits demo: digit and colours of generated images, Classification Accuracy Score).
"""
