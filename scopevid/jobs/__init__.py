"""Many videos per job: prompt files as requests (`requests`), the batch's manifest (`manifest`),
and the local queue that loads the model once and runs every request (`local`)."""
