"""``mjctl simulate``: a local simulated midjourney-proxy upstream for demos, tests and benchmarks.

The simulator (bottle) and the server (granian) are imported inside the command, so that `mjctl --help`
does not load them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from mjctl.cli.output import examples

app = typer.Typer()

FLAVOR_CHOICES = ("java", "csharp")


def _parse_faults(values: list[str]) -> dict[str, float]:
    from mjctl.sim import FAULTS

    faults: dict[str, float] = {}
    for item in values:
        name, sep, rate_text = item.partition("=")
        name = name.strip()
        if not sep or name not in FAULTS:
            raise typer.BadParameter(
                f"expected NAME=RATE with NAME one of {', '.join(FAULTS)}, got {item!r}.", param_hint="--fault"
            )
        try:
            rate = float(rate_text)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise typer.BadParameter(f"the rate of {name} must be a number between 0 and 1.", param_hint="--fault")
        faults[name] = rate
    return faults


@app.command("simulate", epilog=examples('mjctl simulate --port 8090 --fail-rate 0.1 --fault stuck=0.05'))
def simulate(
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on (0 picks a free one).")] = 8090,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    secret: Annotated[str, typer.Option(
        "--secret", help="Expected mj-api-secret; empty disables auth.")] = "sim-secret",
    step_seconds: Annotated[float, typer.Option("--step-seconds", help="Seconds between progress steps.")] = 1.0,
    fail_rate: Annotated[float, typer.Option("--fail-rate", help="Share of tasks (0..1) that end in FAILURE.")] = 0.0,
    flavor: Annotated[str, typer.Option("--flavor", help="Upstream to imitate: java or csharp.")] = "java",
    image_ttl: Annotated[float, typer.Option(
        "--image-ttl", help="Seconds before result image links answer 403.")] = 86400.0,
    image_bytes: Annotated[int | None, typer.Option(
        "--image-bytes", help="Approximate size of result PNGs in bytes (default: a few KB).")] = None,
    accounts: Annotated[int, typer.Option("--accounts", help="Number of simulated Discord accounts.")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Tasks running at once per account.")] = 3,
    queue_size: Annotated[int, typer.Option(
        "--queue-size", help="Tasks waiting per account before the queue is full.")] = 10,
    fault: Annotated[list[str] | None, typer.Option(
        "--fault", help="Inject a fault with a rate, e.g. --fault stuck=0.1 (repeatable).")] = None,
    slow_seconds: Annotated[float, typer.Option("--slow-seconds", help="Delay of the 'slow' fault.")] = 2.0,
    notify_hook: Annotated[str | None, typer.Option(
        "--notify-hook", help="Default notifyHook URL for tasks submitted without one.")] = None,
    public_url: Annotated[str | None, typer.Option(
        "--public-url", help="Base URL for image links (default: the request's host).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for reproducible runs.")] = None,
    threads: Annotated[int, typer.Option("--threads", help="Server worker threads.")] = 16,
) -> None:
    """Run a simulated midjourney-proxy upstream until Ctrl-C (faults: --fault NAME=RATE; see docs/upstream.md)."""
    if not 0 <= port <= 65535:
        raise typer.BadParameter("the port must be between 0 and 65535.", param_hint="--port")
    if step_seconds <= 0:
        raise typer.BadParameter("the step must be a positive number of seconds.", param_hint="--step-seconds")
    if not 0.0 <= fail_rate <= 1.0:
        raise typer.BadParameter("the fail rate must be between 0 and 1.", param_hint="--fail-rate")
    if flavor not in FLAVOR_CHOICES:
        raise typer.BadParameter("the flavor must be java or csharp.", param_hint="--flavor")
    if image_ttl < 0:
        raise typer.BadParameter("the image lifetime cannot be negative.", param_hint="--image-ttl")
    if image_bytes is not None and image_bytes < 0:
        raise typer.BadParameter("the image size cannot be negative.", param_hint="--image-bytes")
    for value, hint in ((accounts, "--accounts"), (concurrency, "--concurrency"), (threads, "--threads")):
        if value < 1:
            raise typer.BadParameter("the value must be at least 1.", param_hint=hint)
    if queue_size < 0:
        raise typer.BadParameter("the queue size cannot be negative.", param_hint="--queue-size")
    if slow_seconds < 0:
        raise typer.BadParameter("the delay cannot be negative.", param_hint="--slow-seconds")
    faults = _parse_faults(fault or [])

    from mjctl.httpserver import serve_forever
    from mjctl.sim import Simulator

    sim = Simulator(
        secret or None,
        step_seconds=step_seconds,
        fail_rate=fail_rate,
        accounts=accounts,
        concurrency=concurrency,
        queue_size=queue_size,
        image_ttl=image_ttl,
        image_bytes=image_bytes,
        flavor=flavor,
        seed=seed,
        faults=faults,
        public_url=public_url,
        slow_seconds=slow_seconds,
        notify_hook=notify_hook,
    )

    def announce(url: str) -> None:
        typer.echo(f"Simulated midjourney-proxy ({flavor}) listening on {url}")
        typer.echo(f"mj-api-secret: {secret}" if secret else "mj-api-secret: (none, authentication disabled)")
        if faults:
            typer.echo("Faults: " + ", ".join(f"{k}={v:g}" for k, v in faults.items()))
        typer.echo(f"Control: {url}/_sim/stats, {url}/_sim/faults. Press Ctrl-C to stop.")

    try:
        try:
            serve_forever(sim.app, host, port, threads, on_ready=announce)
        except OSError as exc:
            typer.echo(f"Error: cannot listen on {host}:{port}: {exc.strerror or exc}.", err=True)
            raise typer.Exit(1) from None
    finally:
        sim.stop()
    typer.echo("Simulator stopped.")
