"""Training tools: the training loop (trainer) behind `morserve train` (command) and
`morserve.lab`, synthetic tasks (tasks, task_eval), target-depth steering (depth_target),
`morserve convert` (vanilla Llama -> MoR), `morserve analyze` (routing analysis, `--compare`),
with their data, loss, schedule, metric and plot helpers."""
