"""Training: the loop, run folders, teachers, schedules."""
