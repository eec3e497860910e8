"""Exit codes shared by every fedsky command and daemon.

0 ok; 1 the operation failed; 2 bad usage (argparse); 3 no feasible placement / nothing meets
the criteria; 69 a service it needs is unavailable (e.g. the controller is not running);
78 bad configuration. `agentctl status` exits 0 only when the agent runs and is connected,
1 when it runs but is not connected, 69 when it is not running.
"""

OK = 0
FAILED = 1
USAGE = 2
INFEASIBLE = 3
UNAVAILABLE = 69
CONFIG = 78
