"""ServerApp: the rounds of one edgefleet federated run (trainer.federated.server)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from trainer.federated.server import serve

    serve(grid, context)
