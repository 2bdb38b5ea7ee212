"""What runs a trained VIPA-VLA model and scores it: Hand3D-test generation (`hand3d_test`), the 3D probe
(`probe3d`), the robot policy and its server, closed-loop rollouts and their environments."""
