"""Flower's side of benchmarks/vs_flower.py: a legacy gRPC server or client on the same task.

Runs with the python of the scratch venv vs_flower.py creates (flwr, numpy; fedmq is not
installed there, its pure-numpy models are found on PYTHONPATH):

    python flower_side.py server --port P --rounds 20 --out DIR
    python flower_side.py client --port P --data shard-0.npz --seed 1 --out DIR --name c0

The client trains with fedmq's own LogisticRegression (fedmq/models/numpy_models.py, numpy
only), with the seeds and batch order of fedmq's LocalTrainer (rng = default_rng([seed,
round]), zero init, SGD), so both sides end on the same model up to float rounding. Every
process writes its events (wall clock, time.time()) and its peak RSS to OUT/NAME.json for
the launcher to read.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

INPUTS, CLASSES = 64, 10


def peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- processes ----------------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    events: list[dict] = []
    out = Path(args.out)

    class TimedFedAvg(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            events.append({"event": "configure_fit", "round": server_round, "t": time.time()})
            instructions = super().configure_fit(server_round, parameters, client_manager)
            events.append({"event": "clients_sampled", "round": server_round, "t": time.time()})
            return instructions

        def aggregate_fit(self, server_round, results, failures):
            events.append({"event": "aggregate_fit", "round": server_round, "t": time.time()})
            aggregated = super().aggregate_fit(server_round, results, failures)
            events.append({"event": "round_closed", "round": server_round, "t": time.time(),
                           "participants": len(results), "failures": len(failures)})
            if server_round == args.rounds and aggregated[0] is not None:
                w, b = parameters_to_ndarrays(aggregated[0])
                np.savez(out / "flower-final.npz", w=w, b=b)
            print(f"closed {server_round} {time.time():.6f}", flush=True)
            return aggregated

    def fit_config(server_round: int) -> dict:
        return {"round": server_round, "epochs": args.epochs, "batch_size": args.batch_size,
                "lr": args.lr}

    init = [np.zeros((INPUTS, CLASSES), np.float32), np.zeros(CLASSES, np.float32)]
    strategy = TimedFedAvg(
        fraction_fit=1.0, min_fit_clients=args.clients, min_available_clients=args.clients,
        fraction_evaluate=0.0, min_evaluate_clients=0, on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters(init))
    fl.server.start_server(server_address=f"127.0.0.1:{args.port}",
                           config=fl.server.ServerConfig(num_rounds=args.rounds),
                           strategy=strategy)
    (out / "server.json").write_text(json.dumps({"events": events,
                                                 "peak_rss_kb": peak_rss_kb()}))
    return 0


def run_client(args: argparse.Namespace) -> int:
    import flwr as fl

    from fedmq.models.numpy_models import LogisticRegression  # what fedmq's agents train

    model = LogisticRegression(inputs=INPUTS, classes=CLASSES)
    data = np.load(args.data)
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)
    events: list[dict] = []

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config):
            return [np.zeros((INPUTS, CLASSES), np.float32), np.zeros(CLASSES, np.float32)]

        def fit(self, parameters, config):
            rnd = int(config["round"])
            events.append({"event": "fit_start", "round": rnd, "t": time.time()})
            model.set_flat(np.concatenate([np.asarray(p, np.float32).ravel()
                                           for p in parameters]))
            rng = np.random.default_rng([args.seed, rnd])
            result = model.train(x, y, epochs=int(config["epochs"]),
                                 batch_size=int(config["batch_size"]), lr=float(config["lr"]),
                                 rng=rng)
            events.append({"event": "fit_end", "round": rnd, "t": time.time()})
            return ([model.p["w"].copy(), model.p["b"].copy()], result.num_samples,
                    {"loss": result.loss})

    fl.client.start_client(server_address=f"127.0.0.1:{args.port}",
                           client=Client().to_client(), insecure=True, transport="grpc-bidi")
    (Path(args.out) / f"{args.name}.json").write_text(json.dumps(
        {"events": events, "peak_rss_kb": peak_rss_kb()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--data", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="client")
    args = parser.parse_args(argv)
    return run_server(args) if args.role == "server" else run_client(args)


if __name__ == "__main__":
    sys.exit(main())
