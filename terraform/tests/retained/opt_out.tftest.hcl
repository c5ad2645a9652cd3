# Expected to fail (ci/terraform/run checks how): retain_on_destroy = false on a retained
# cluster, without the state move first, is refused (the volumes would otherwise be destroyed
# and made again, empty).

# The mocked values every test of the module shares.
mock_provider "aws" {
  source = "./tests/mocks"
}

variables {
  app_name      = "kafka"
  node_image    = "ami-0123456789abcdef0"
  instance_type = "m6i.large"
  nodes = [
    { node_id = "1", node_ip = "10.0.1.11", node_subnet_id = "subnet-a" },
    { node_id = "2", node_ip = "10.0.2.12", node_subnet_id = "subnet-b" },
    { node_id = "3", node_ip = "10.0.3.13", node_subnet_id = "subnet-c" },
  ]
  security_groups = ["sg-0123456789abcdef0"]
  data_volume = {
    size_in_gibs           = 100
    type                   = "gp3"
    mount_path             = "/var/lib/kafka"
    file_system_type       = "xfs"
    mount_path_owner_user  = "kafka"
    mount_path_owner_group = "kafka"
  }
  roll_command = "true"
}

run "apply_retained" {}

run "opt_out_without_a_state_move" {
  command = plan
  variables {
    retain_on_destroy = false
  }
}
