"""L3: what is done to a built machine, through its public state API: snapshots and clones
(snapshot.py: files only), live migration (migration.py: the stream only; channel.py: its wire,
with MACs and deadlines) and the control
socket (control.py: requests only)."""
