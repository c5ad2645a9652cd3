# A 3-node ZooKeeper ensemble whose nodes keep their data and IP across replacement, rolled node
# by node when the launch template changes. Bring your own VPC: three subnets, one per zone.

terraform {
  required_version = ">= 1.7.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  type    = string
  default = "eu-west-1"
}

variable "vpc_id" {
  type = string
}

variable "subnet_ids" {
  description = "Three subnets (one per availability zone)."
  type        = list(string)
}

variable "node_ips" {
  description = "A free private IP in each subnet, in the same order."
  type        = list(string)
}

variable "image_id" {
  description = "An image with Java, ZooKeeper under /opt/zookeeper and cps-attach in /usr/local/bin."
  type        = string
}

resource "aws_security_group" "zookeeper" {
  name_prefix = "zookeeper-"
  description = "ZooKeeper clients and ensemble traffic inside the VPC"
  vpc_id      = var.vpc_id

  ingress {
    description = "clients, followers, elections"
    from_port   = 2181
    to_port     = 3888
    protocol    = "tcp"
    self        = true
  }

  egress {
    description = "clients, followers, elections"
    from_port   = 2181
    to_port     = 3888
    protocol    = "tcp"
    self        = true
  }

  egress {
    description = "AWS APIs and package mirrors"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

locals {
  ids = ["1", "2", "3"]
  # Every node knows every node by its fixed IP.
  servers = join("\n", [for i, id in local.ids : "server.${id}=${var.node_ips[i]}:2888:3888"])
  zoo_cfg = <<-EOT
    tickTime=2000
    initLimit=10
    syncLimit=5
    dataDir=/var/lib/zookeeper
    clientPort=2181
    ${local.servers}
  EOT
}

module "zookeeper" {
  source = "../.."

  app_name      = "zookeeper"
  node_image    = var.image_id
  instance_type = "t3.medium"
  nodes = [for i, id in local.ids : {
    node_id        = id
    node_ip        = var.node_ips[i]
    node_subnet_id = var.subnet_ids[i]
  }]
  node_files = [for id in local.ids : {
    node_id = id
    node_files_toupload = [
      { contents = base64encode(local.zoo_cfg), destination = "/opt/zookeeper/conf/zoo.cfg" },
      { contents = base64encode("${id}\n"), destination = "/var/lib/zookeeper/myid" },
    ]
  }]
  configure_command = ["systemctl", "restart", "zookeeper"]
  # Healthy when this server is part of a quorum (leader or follower).
  health_command  = ["sh", "-c", "echo srvr | nc -w 2 127.0.0.1 2181 | grep -Eq 'Mode: (leader|follower)'"]
  security_groups = [aws_security_group.zookeeper.id]
  data_volume = {
    size_in_gibs           = 20
    type                   = "gp3"
    mount_path             = "/var/lib/zookeeper"
    file_system_type       = "xfs"
    mount_params           = ["noatime"]
    mount_path_owner_user  = "zookeeper"
    mount_path_owner_group = "zookeeper"
  }
}

output "node_ips" {
  value = module.zookeeper.node_ips
}

output "asg_names" {
  value = module.zookeeper.asg_names
}
