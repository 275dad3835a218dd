"""Training tools: `morserve train` (trainer), `morserve convert` (vanilla Llama -> MoR),
`morserve analyze` (routing analysis), with their data, loss, schedule, metric and plot helpers."""
