"""Ready-made Trainers (fedmq.api): a PyTorch module, numpy arrays with a gradient
function, a scikit-learn estimator with partial_fit.

Each module imports its library only when a Trainer is made, so `import fedmq` and a
task module that names them stay light; a missing library says which extra installs it.
"""
