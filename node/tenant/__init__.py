"""The tenant's side: the auction client, the task client, sweeps, gangs, jobs."""
