"""ClientApp: train the global model on this host's windows (trainer.federated.client).

The local-DP mod sits on the train handler only: on the whole ClientApp it would also wrap
evaluate, whose reply carries no arrays.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from trainer.federated.client import evaluate_handler, local_dp_mod, train_handler

app = ClientApp()


@app.train(mods=[local_dp_mod])
def train(msg: Message, context: Context) -> Message:
    return train_handler(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return evaluate_handler(msg, context)
