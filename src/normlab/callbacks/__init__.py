"""Lightning callbacks and the measurement maths they use: ICS, loss landscape, PreciseBN."""
