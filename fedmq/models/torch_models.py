"""The torch architectures of the keyboard and sensor tasks, built by name from a config.

Imported only when one of them is built (fedmq.models registers them lazily), so
the agent's base install never imports torch.
"""

from __future__ import annotations

from fedmq.errors import ConfigError, require
from fedmq.models.torch_backend import TorchModel

torch = require("torch", "torch")
nn = torch.nn


class CharRNN(nn.Module):
    """Character ids (batch, seq) -> logits of the next character (batch, vocab)."""

    def __init__(self, *, vocab: int, embed: int, hidden: int, layers: int, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed, hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids):
        states, _ = self.rnn(self.embed(ids))
        return self.out(states[:, -1])

    def forward_all(self, ids):
        """Logits of the next character after every position (batch, seq, vocab)."""
        states, _ = self.rnn(self.embed(ids))
        return self.out(states)


# A char_gru's local training loss: "last" scores the next character after the window
# only; "all" scores the next character after every position of the window (the window's
# own characters are the targets of the earlier positions), 64 targets per window instead
# of one for the same forward pass. Inference is the same either way.
CHAR_LOSSES = ("all", "last")


def all_positions_loss(module: CharRNN, ids, target):
    """Mean cross-entropy of every position's next character: ids[:, 1:] then target."""
    logits = module.forward_all(ids)
    targets = torch.cat([ids[:, 1:], target[:, None]], dim=1)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       targets.reshape(-1))


class HarCNN(nn.Module):
    """Sensor windows (batch, channels, steps) -> activity logits (batch, classes)."""

    def __init__(self, *, channels: int, classes: int, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, width, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(width, 2 * width, kernel_size=5, padding=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.out = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.out(self.features(x))


def _check(name: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"model {name}: {key} must be a positive integer, got {value!r}")


def char_gru(*, vocab: int, seq_len: int, embed: int = 8, hidden: int = 128, layers: int = 1,
             cell: str = "gru", threads: int = 1, loss: str = "all", optimizer: str = "sgd",
             seed: int = 0) -> TorchModel:
    """Keyboard model: embedding -> GRU (or LSTM) -> linear over the vocabulary, trained
    with the loss at every position of the window (`loss="last"`: the last only) by
    `optimizer` (torch_backend.LOCAL_OPTIMIZERS: "sgd", or "adam" with fresh state each
    round)."""
    _check("char_gru", vocab=vocab, seq_len=seq_len, embed=embed, hidden=hidden, layers=layers,
           threads=threads)
    if cell not in ("gru", "lstm"):
        raise ConfigError(f"model char_gru: cell must be 'gru' or 'lstm', got {cell!r}")
    if loss not in CHAR_LOSSES:
        raise ConfigError(f"model char_gru: loss must be one of {CHAR_LOSSES}, got {loss!r}")
    return TorchModel.build(
        "char_gru",
        lambda: CharRNN(vocab=vocab, embed=embed, hidden=hidden, layers=layers, cell=cell),
        seed=seed, example_shape=(seq_len,), example_dtype="int64", threads=threads,
        report_top3=True, train_loss=all_positions_loss if loss == "all" else None,
        optimizer=optimizer,
    )


def har_cnn(*, channels: int, steps: int, classes: int, width: int = 16, threads: int = 1,
            seed: int = 0) -> TorchModel:
    """Sensor model: two 1-D convolutions, global average pooling, linear."""
    _check("har_cnn", channels=channels, steps=steps, classes=classes, width=width,
           threads=threads)
    return TorchModel.build(
        "har_cnn", lambda: HarCNN(channels=channels, classes=classes, width=width), seed=seed,
        example_shape=(channels, steps), threads=threads,
    )
