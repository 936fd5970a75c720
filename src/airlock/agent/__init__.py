"""The volunteer agent: pulls tasks from an Airlock server and runs them in a bubblewrap sandbox.

Modules: `main` (options and the main loop), `client` (HTTP with retries), `runner` (one task from
assignment to report), `sandbox` (bwrap and resource limits), `host` (host description and state file),
`faults` (misbehaviour for the demo and the tests).
"""

from airlock.agent.main import AgentOptions, add_agent_arguments, options_from_args, run_agent

__all__ = ["AgentOptions", "add_agent_arguments", "options_from_args", "run_agent"]
