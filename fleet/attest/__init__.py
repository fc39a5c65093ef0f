"""What a TDX guest measures and how to check it: measurement profiles per dstack release, RTMR3
replay, quote and TcbInfo verification. Imports ``fleet.config`` (value markers) only."""
